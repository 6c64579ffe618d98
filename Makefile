# Shortcuts for the scripts (each installs what it needs on a fresh Debian machine).
.PHONY: demo test bench bench-quick image
demo:
	./scripts/demo
test:
	./scripts/test
bench:
	./scripts/bench
bench-quick:
	./scripts/bench --quick
image:
	bash scripts/build-image.sh
