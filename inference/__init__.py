"""Model runtime of bone-dicomnode: bundles, registry, device handling and the five task pipelines."""

DISTRIBUTION = "bone-dicomnode"
