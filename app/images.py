"""Container images: `make images` runs `python -m app.images build`.

    python -m app.images build [--only train,eval,mlflow] [--engine docker|podman] [--base-image IMAGE]
                               [--wheelhouse DIR] [--registry REG/PATH]
    python -m app.images wheelhouse DIR        # wheels of torch==2.13.0 and every dependency, for offline builds
    python -m app.images base --tag TAG        # a local Debian base with python3 + venv (debootstrap; root, podman)

The training and evaluation images are two targets of one Dockerfile (`containers/Dockerfile`, built with
`--target train` / `--target eval`, as a plain `docker build` would be); the MLflow server has its own
(`containers/mlflow.Dockerfile`). Tags follow k8s/base/kustomization.yaml (crescent/train:VERSION,
crescent/eval:VERSION, crescent/mlflow:3.17.2). With --wheelhouse the build context is a temporary copy of the
sources plus those wheels, and the build runs with no network (pip uses only the wheelhouse).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONTEXT_PATHS = ["pyproject.toml", "constraints.txt", "README.md", ".dockerignore", "app", "components", "eval",
                 "containers"]
MLFLOW_VERSION = "3.17.2"
# Wheels the images need beyond the project's own dependencies (the MLflow image's Postgres driver; keep in step
# with containers/mlflow.Dockerfile).
WHEELHOUSE_EXTRAS = ("psycopg2-binary==2.9.13",)
IMAGE_EXTRAS = ("eval", "s3")  # the project extras the images install (containers/Dockerfile)
DEBIAN_MIRROR = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class Image:
    name: str
    dockerfile: str
    repository: str
    tag: str
    target: str | None = None  # the Dockerfile stage to build (None: its last stage)
    stages: tuple[str, ...] = ()  # its intermediate stages, in build order (tagged by the offline test build)

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"


def project_version() -> str:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


def images(registry: str | None = None) -> dict[str, Image]:
    prefix = f"{registry.rstrip('/')}/" if registry else ""
    version = project_version()
    return {
        "train": Image("train", "containers/Dockerfile", f"{prefix}crescent/train", version, "train",
                       ("deps", "train-deps", "app")),
        "eval": Image("eval", "containers/Dockerfile", f"{prefix}crescent/eval", version, "eval",
                      ("deps", "eval-deps", "app", "eval-data")),
        "mlflow": Image("mlflow", "containers/mlflow.Dockerfile", f"{prefix}crescent/mlflow", MLFLOW_VERSION,
                        stages=("build",)),
    }


def detect_engine(preferred: str = "auto") -> str:
    """docker if it is installed, else podman; a clear error when neither is."""
    candidates = ["docker", "podman"] if preferred == "auto" else [preferred]
    for engine in candidates:
        if shutil.which(engine):
            return engine
    raise SystemExit(f"images: no container engine found (looked for {', '.join(candidates)} on PATH); "
                     "install docker or podman")


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build_command(engine: str, image: Image, context: Path, base_image: str | None = None,
                  offline: bool = False) -> list[str]:
    cmd = [engine, "build", "--file", str(context / image.dockerfile), "--tag", image.ref]
    if image.target:
        cmd += ["--target", image.target]
    cmd += ["--build-arg", f"VERSION={image.tag}", "--build-arg", f"SOURCE={_git('remote', 'get-url', 'origin')}",
           "--build-arg", f"REVISION={_git('rev-parse', 'HEAD')}"]
    if base_image:
        cmd += ["--build-arg", f"BASE_IMAGE={base_image}"]
    if offline:  # every wheel is in the context: no index, no network at all
        cmd += ["--build-arg", "PIP_NO_INDEX=1", "--network=none"]
    return cmd + [str(context)]


def prepare_context(dest: Path, wheelhouse: Path | None = None) -> Path:
    """A build context with only what the Dockerfiles copy, plus the wheelhouse's wheels (hard links if possible)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for rel in CONTEXT_PATHS:
        src = REPO_ROOT / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel, ignore=ignore, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, dest / rel)
    if wheelhouse:
        target = dest / "containers" / "wheelhouse"
        for wheel in Path(wheelhouse).glob("*.whl"):
            if wheel.name.startswith("crescent-"):
                continue  # the project itself is built from the copied sources
            try:
                os.link(wheel, target / wheel.name)
            except OSError:
                shutil.copy2(wheel, target / wheel.name)
    return dest


def build_wheelhouse(directory: Path, python: str = sys.executable) -> None:
    """Wheels for torch==2.13.0 (first: the CPU wheel on this host), the build backend, every dependency of the
    images' roles (`crescent[eval,s3]`) and WHEELHOUSE_EXTRAS."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run([python, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(directory),
                    "--constraint", str(REPO_ROOT / "constraints.txt"), "torch==2.13.0", "setuptools>=68",
                    "wheel", *WHEELHOUSE_EXTRAS, f"{REPO_ROOT}[{','.join(IMAGE_EXTRAS)}]"], check=True)


def build_base(tag: str, engine: str = "podman", mirror: str | None = None, suite: str = "bookworm") -> None:
    """A local base image (no registry needed): debootstrap minbase + python3, python3-venv, imported by tag."""
    if shutil.which("debootstrap") is None:
        raise SystemExit("images: debootstrap is not installed (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory(prefix="crescent-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                        suite, str(rootfs), mirror or apt_mirror()], check=True, stdout=subprocess.DEVNULL)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / cache).glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run([engine, "import", "--change",
                        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                        "--change", 'CMD ["/bin/bash"]', "-", tag], stdin=tar.stdout, check=True,
                       stdout=subprocess.DEVNULL)
        if tar.wait() != 0:
            raise SystemExit("images: tar of the debootstrap root failed")


def apt_mirror() -> str:
    """The Debian mirror apt already uses (deb822 or one-line sources), else deb.debian.org."""
    for path in [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if line.startswith("URIs:") and len(words) > 1 and "security" not in words[1]:
                return words[1]
            if line.startswith("deb ") and len(words) > 2 and "security" not in words[1]:
                return words[1] if not words[1].startswith("[") else words[2]
    return DEBIAN_MIRROR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.images", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="build the images with docker or podman")
    b.add_argument("--only", default="train,eval,mlflow", help="comma-separated subset of train,eval,mlflow")
    b.add_argument("--engine", default="auto", choices=["auto", "docker", "podman"])
    b.add_argument("--base-image", help="BASE_IMAGE for train and eval (default: the Dockerfile's CUDA image)")
    b.add_argument("--mlflow-base-image", help="BASE_IMAGE for the MLflow image")
    b.add_argument("--wheelhouse", type=Path, help="build offline from these wheels (see `wheelhouse`)")
    b.add_argument("--registry", help="prefix for the tags, e.g. registry.example.com/team")
    b.add_argument("--dry-run", action="store_true", help="print the commands only")
    w = sub.add_parser("wheelhouse", help="collect the wheels for an offline build")
    w.add_argument("directory", type=Path)
    s = sub.add_parser("base", help="a local Debian base image with python3 + venv (root; debootstrap)")
    s.add_argument("--tag", default="localhost/crescent-base:bookworm")
    s.add_argument("--engine", default="podman", choices=["docker", "podman"])
    s.add_argument("--mirror", help="Debian mirror (default: the one apt uses)")
    args = parser.parse_args(argv)

    if args.action == "wheelhouse":
        build_wheelhouse(args.directory)
        return 0
    if args.action == "base":
        build_base(args.tag, args.engine, args.mirror)
        print(args.tag)
        return 0
    known = images(args.registry)
    wanted = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        parser.error(f"--only {args.only!r}: unknown {unknown}; choose from {sorted(known)}")
    engine = "docker" if args.dry_run and args.engine == "auto" else detect_engine(args.engine)
    with tempfile.TemporaryDirectory(prefix="crescent-context-") as tmp:
        context = prepare_context(Path(tmp), args.wheelhouse) if args.wheelhouse else REPO_ROOT
        for name in wanted:
            base = args.mlflow_base_image if name == "mlflow" else args.base_image
            cmd = build_command(engine, known[name], context, base, offline=args.wheelhouse is not None)
            print("+ " + " ".join(cmd), flush=True)
            if not args.dry_run:
                subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
