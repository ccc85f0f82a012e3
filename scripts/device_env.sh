# Source this first in a command on the borrowed GPU machine (no registry there): it installs the
# wheels carried in .whl/ (`carry: [".whl"]`) into /tmp/site, puts them and the repo on PYTHONPATH,
# then imports every package the server, its tests and the benches need, printing their versions.
#
#   . scripts/device_env.sh || exit 1; python3 -m pytest tests/gpu -q ...
#
# The wheels (fastapi, uvicorn, pydantic, openai, mamba-ssm built pure-Python, ...) are for CPython
# 3.12 manylinux x86_64; the machine's own packages (torch, triton, transformers, einops, httpx,
# prometheus-client, pytest, click, ...) are used as they are. A missing or broken package fails here,
# loudly, before any GPU time is spent on a test.
#
# .whl/ is git-ignored (/.whl/ in .git/info/exclude); to rebuild it here, from the repo root:
#   p="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl --platform manylinux2014_x86_64"
#   .venv/bin/pip download $p --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
#     fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2 uvicorn==0.54.0 \
#     h11==0.16.0 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 anyio==4.16.0 idna==3.20 \
#     openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0 sniffio==1.3.1 \
#     pytest-asyncio==1.5.0 hypothesis==6.170.17 redis==8.1.0 hiredis==3.5.0 uvloop==0.23.0 \
#     pytest-xdist==3.8.0 execnet==2.1.2
#   .venv/bin/pip download $p --platform manylinux1_x86_64 --platform manylinux_2_28_x86_64 httptools==0.9.0
# and the remote tier's server, Debian 12's redis-server with its libraries (not a wheel: the machine has
# none), in .whl/redis-server/{redis-server.bin,lib/,bin/redis-server}, bin/ being a wrapper that sets
# LD_LIBRARY_PATH; this script puts bin/ on PATH when it is there.
#   MAMBA_SKIP_CUDA_BUILD=TRUE .venv/bin/pip download --no-binary :all: --no-deps --no-build-isolation \
#     mamba-ssm==2.3.2.post1 -d /tmp/sd
#   MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE .venv/bin/pip wheel --no-deps --no-build-isolation \
#     /tmp/sd/mamba_ssm-2.3.2.post1.tar.gz -w .whl
# (the machine has pytest, click, attrs, sortedcontainers, einops, ninja; mamba-ssm's tilelang and
# quack-kernels serve only its Mamba3 kernels, imported optionally.)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl && export PYTHONPATH="/tmp/site:$PWD" PATH="$PWD/.whl/redis-server/bin:$PATH" || { echo "device_env: wheel install failed" >&2; return 1 2>/dev/null || exit 1; }
python3 - <<'PYEOF' || { echo "device_env: import check failed" >&2; return 1 2>/dev/null || exit 1; }
import importlib
import importlib.metadata as md
import sys

# (module, distribution): every one must import
PACKAGES = [
    ("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"), ("einops", "einops"),
    ("tokenizers", "tokenizers"), ("safetensors", "safetensors"), ("numpy", "numpy"),
    ("prometheus_client", "prometheus-client"), ("jinja2", "jinja2"), ("httpx", "httpx"),
    ("fastapi", "fastapi"), ("starlette", "starlette"), ("uvicorn", "uvicorn"), ("h11", "h11"),
    ("uvloop", "uvloop"), ("httptools", "httptools"),
    ("click", "click"), ("anyio", "anyio"), ("pydantic", "pydantic"), ("pydantic_core", "pydantic-core"),
    ("pydantic_settings", "pydantic-settings"), ("dotenv", "python-dotenv"), ("redis", "redis"), ("hiredis", "hiredis"),
    ("annotated_types", "annotated-types"), ("annotated_doc", "annotated-doc"),
    ("typing_inspection", "typing-inspection"), ("typing_extensions", "typing-extensions"),
    ("opentelemetry", "opentelemetry-api"), ("openai", "openai"), ("httpx2", "httpx2"),
    ("httpcore2", "httpcore2"), ("truststore", "truststore"), ("jiter", "jiter"), ("sniffio", "sniffio"),
    ("idna", "idna"), ("pytest", "pytest"), ("pytest_asyncio", "pytest-asyncio"), ("xdist", "pytest-xdist"),
    ("execnet", "execnet"),
    ("hypothesis", "hypothesis"), ("sortedcontainers", "sortedcontainers"), ("attrs", "attrs"),
]
failed = []
for module, dist in PACKAGES:
    try:
        importlib.import_module(module)
        print(f"{dist} {md.version(dist)}", end="; ")
    except Exception as exc:  # report every failure, not only the first
        failed.append(f"{dist}: {type(exc).__name__}: {exc}")
print()
import torch  # noqa: E402

from server.model.kernels import load_kernels  # noqa: E402  (imports mamba_ssm behind its stub)

try:
    print(f"mamba-ssm {md.version('mamba-ssm')}", end="; ")
except md.PackageNotFoundError:
    failed.append("mamba-ssm: not installed")
kernels = load_kernels()
print(kernels.summary())
if not kernels.gpu_ready:
    failed.append(f"GPU kernels: {kernels.summary()}")
print(f"python {sys.version.split()[0]}, cuda {torch.cuda.is_available()}", end="")
print(f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "")
if failed:
    sys.exit("device_env: MISSING OR BROKEN:\n  " + "\n  ".join(failed))
PYEOF
