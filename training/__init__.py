"""Training package of bone-dicomnode: synthetic studies, datasets, trainers, evaluation, retraining."""

DISTRIBUTION = "bone-dicomnode"
