# The README's two commands: `make demo` and `make test`. Both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU installs pin torch to the cached CPU wheel (see constraints-cpu.txt); GPU images pass CONSTRAINTS=
CONSTRAINTS ?= constraints-cpu.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: setup sysdeps demo clean-demo test bench info monitor clean

# espeak-ng speaks the built-in corpus; flite and festival (with two voices) add the other voices the speech
# encoder's corpus holds (deepomni foundations build). Installed from Debian when missing and we are root
SPEAKERS := espeak-ng flite festival festvox-kallpc16k festvox-us-slt-hts
sysdeps:
	@command -v espeak-ng >/dev/null && command -v flite >/dev/null && command -v text2wave >/dev/null \
	  && [ -d /usr/share/festival/voices/us/cmu_us_slt_arctic_hts ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SPEAKERS) >/dev/null; \
	  else echo "warning: missing speakers (apt-get install $(SPEAKERS)): built-in speech data is limited"; fi; }

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_C) -e '.[dev]'
	touch $(STAMP)

setup: sysdeps $(STAMP)

# the main job: shipped foundations (base LLM + speech encoder) -> corpus -> prepare -> S1 -> profile -> S2 -> S3
# + baseline -> evaluation table (steps already done under runs/demo are skipped; `make clean-demo` starts over)
# the 15-minute cut on 2 cores: one baseline and 20 held-out items per task, at full steps; the
# whole recipe with every baseline is `make demo DEMO_ARGS=` and, over seeds,
# benchmarks/recipe_table.py
DEMO_ARGS ?= --baselines full_finetune --eval-items 20
demo: setup
	$(VENV)/bin/deepomni pipeline --out runs/demo $(DEMO_ARGS)

clean-demo:
	rm -rf runs/demo

test: setup
	PYTHONFAULTHANDLER=1 $(PY) -m pytest  # a crash (even at exit) prints every thread's stack

bench: setup
	$(PY) -m benchmarks.moe_layer
	$(PY) -m benchmarks.codec_quality
	$(PY) -m benchmarks.data_pipeline

info: setup
	$(PY) -m deepomni.cli info --preset deepseek-v2-lite

# a local Prometheus on 127.0.0.1:9090 scraping the cluster/local.sh head (docs/monitoring.md); Debian's
# prometheus is installed when missing and we are root. `cluster/monitor.sh stop` stops it.
monitor:
	@command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  else echo "prometheus is missing: apt-get install prometheus"; exit 1; fi; }
	cluster/monitor.sh start

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
