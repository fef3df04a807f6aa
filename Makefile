.PHONY: demo demo-clean shell test lint
# main job: synthetic studies through a real Orthanc, the node, and back (table, demo-out/index.html)
demo:
	bash scripts/demo.sh
# forget the demo's earlier results (Orthanc storage, node state, overlays); the synthetic studies are kept
demo-clean:
	rm -rf demo-out/orthanc demo-out/var demo-out/results demo-out/overlays demo-out/index.html demo-out/viewer.txt
# an interactive shell with .venv/bin first on PATH: dicomnode, dicomnode-train (exit to leave)
shell:
	@test -x .venv/bin/dicomnode || bash scripts/bootstrap.sh
	@echo "dicomnode and dicomnode-train are on PATH in this shell (.venv); type exit to leave"
	@VIRTUAL_ENV="$(CURDIR)/.venv" PATH="$(CURDIR)/.venv/bin:$$PATH" "$${SHELL:-/bin/bash}" -i
test:
	bash scripts/test.sh
lint:
	.venv/bin/ruff check dicomnode inference training tests benchmarks scripts
	PYTHONPATH="$(CURDIR)" .venv/bin/lint-imports --no-cache
