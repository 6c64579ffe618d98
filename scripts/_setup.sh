# Sourced by scripts/demo and scripts/test: installs what keygate needs on a fresh Debian machine.
# Usage: KEYGATE_APT_EXTRA="postgresql" KEYGATE_PIP_EXTRAS="dev" . scripts/_setup.sh
set -euo pipefail

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

need=()
command -v softhsm2-util >/dev/null 2>&1 || need+=(softhsm2)
for pkg in ${KEYGATE_APT_EXTRA:-}; do
  case "$pkg" in
    postgresql)
      ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql) ;;
    *) dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg") ;;
  esac
done

PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  need+=(python3)
fi
if [ "${#need[@]}" -gt 0 ]; then
  echo "setup: installing ${need[*]} (apt)" >&2
  apt_install "${need[@]}"
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: keygate needs Python 3.11 or newer ($PYTHON is $("$PYTHON" -V 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -m venv .venv >/dev/null 2>&1; then
    rm -rf .venv
    echo "setup: installing python3-venv (apt)" >&2
    apt_install python3-venv
    "$PYTHON" -m venv .venv
  fi
fi

extras="${KEYGATE_PIP_EXTRAS:-}"
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
stamp=".venv/.keygate-installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1) ${extras}"
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
  echo "setup: installing keygate ${spec} into .venv (pip)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e "$spec"
  echo "$want" >"$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
