# Environment for GPU scripts on the lent device machine. SOURCE it from the repository root:
#
#     . benchmarks/gpu_env.sh || exit 1
#
# The device image has python3 with torch, transformers, safetensors, sentencepiece ... but not zarr,
# numcodecs, donfig, google-crc32c or pydantic, and maybe older timm / peft / click / pluggy / tifffile.
# Wheels for those travel in .devcarry/whl (name `.devcarry` in run's `carry`). This script:
#   * installs each carried wheel whose distribution is missing here or older than the carried version
#     (pip --no-index --no-deps --target $WSI_SITE, default /tmp/site), and nothing else;
#   * puts $WSI_SITE and ./core first on PYTHONPATH (wsi_llava runs from the tree, not installed);
#   * exports HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1, PYTHONUNBUFFERED=1 and keeps NVLink multicast off;
#   * writes $WSI_BIN/wsi-llava (default /tmp/bin), the `wsi-llava` command as a user types it, and puts
#     $WSI_BIN first on PATH.
# Idempotent: sourcing it twice installs nothing the second time. Returns non-zero if wsi_llava.cli
# does not import. PYTHON (default python3), WSI_SITE, WSI_BIN and WSI_WHEELS may be overridden.

_wsi_root=$PWD
_wsi_py=${PYTHON:-python3}
_wsi_py=$(command -v "$_wsi_py") || { echo "gpu_env: no ${PYTHON:-python3}" >&2; return 1; }
: "${WSI_SITE:=/tmp/site}" "${WSI_BIN:=/tmp/bin}" "${WSI_WHEELS:=$_wsi_root/.devcarry/whl}"
export WSI_SITE WSI_BIN
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
case ":${PYTHONPATH:-}:" in *":$WSI_SITE:"*) ;; *) export PYTHONPATH=$WSI_SITE${PYTHONPATH:+:$PYTHONPATH} ;; esac
case ":$PYTHONPATH:" in *":$_wsi_root/core:"*) ;; *) export PYTHONPATH=$PYTHONPATH:$_wsi_root/core ;; esac

if [ -d "$WSI_WHEELS" ]; then
    # the carried wheels whose distribution is absent or older than the wheel (PYTHONPATH already has $WSI_SITE)
    _wsi_need=$("$_wsi_py" - "$WSI_WHEELS" <<'EOF'
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def key(v: str) -> tuple:
    try:
        from packaging.version import Version

        return (Version(v),)
    except Exception:
        return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.+-]", v))


for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    dist, ver = whl.name.split("-")[:2]
    try:
        have = version(dist)
    except PackageNotFoundError:
        have = None
    if have is None or key(have) < key(ver):
        print(whl)
        print(f"gpu_env: {dist} {have or 'missing'} -> {ver}", file=sys.stderr)
EOF
    ) || { echo "gpu_env: could not check the installed packages" >&2; return 1; }
    if [ -n "$_wsi_need" ]; then
        # shellcheck disable=SC2086
        "$_wsi_py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$WSI_SITE" $_wsi_need >&2 || { echo "gpu_env: pip install failed" >&2; return 1; }
    fi
fi

mkdir -p "$WSI_BIN"
cat >"$WSI_BIN/wsi-llava" <<EOF
#!/bin/sh
# the wsi-llava console script, for a tree that is on PYTHONPATH but not pip-installed
exec "$_wsi_py" -c 'import sys; sys.argv[0] = "wsi-llava"; from wsi_llava.cli import main; main()' "\$@"
EOF
chmod +x "$WSI_BIN/wsi-llava"
case ":$PATH:" in *":$WSI_BIN:"*) ;; *) export PATH=$WSI_BIN:$PATH ;; esac

"$_wsi_py" -c "
import sys, importlib.metadata as md
import wsi_llava.cli  # noqa: F401  (the CLI and every built-in command import)
def ver(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return 'missing'
names = ('torch', 'transformers', 'timm', 'peft', 'zarr', 'pydantic', 'tifffile', 'safetensors')
print('gpu_env:', ', '.join(f'{n} {ver(n)}' for n in names), file=sys.stderr)
" || { echo "gpu_env: wsi_llava.cli does not import" >&2; return 1; }
unset _wsi_root _wsi_py _wsi_need
