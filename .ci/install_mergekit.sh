#!/usr/bin/env bash
# Installs mergekit (the reference implementation `fusion merge-yaml` is checked against) into its
# own virtual environment outside the repository, so its pinned dependencies never touch the
# environment `fusion` is tested in. Idempotent: a working install is detected and kept (well
# under a second). Never fails CI: if the install is impossible (no registry, a dependency
# conflict), it says so and exits 0, and the parity tests skip with that reason.
#
#   MERGEKIT_VENV   where the venv lives (default $HOME/.cache/fusion/mergekit-venv)
#   MERGEKIT_SPEC   what pip installs (default mergekit)
set -uo pipefail
venv="${MERGEKIT_VENV:-$HOME/.cache/fusion/mergekit-venv}"
spec="${MERGEKIT_SPEC:-mergekit}"

if [ -x "$venv/bin/mergekit-yaml" ] && "$venv/bin/python" -c "import mergekit" 2>/dev/null; then
    echo "install_mergekit: already installed in $venv"
    exit 0
fi

start=$(date +%s)
# Reuse the system's torch (and anything else already there) when the versions fit; a plain venv
# would download a second torch.
if ! { python -m venv --system-site-packages "$venv" && "$venv/bin/python" -m pip install -q "$spec"; }; then
    echo "install_mergekit: warning: could not install $spec into $venv; mergekit parity tests will skip" >&2
    exit 0
fi
if ! "$venv/bin/python" -c "import mergekit" 2>/dev/null; then
    echo "install_mergekit: warning: $spec installed but does not import; mergekit parity tests will skip" >&2
    exit 0
fi
echo "install_mergekit: installed $spec into $venv in $(( $(date +%s) - start )) s"
exit 0
