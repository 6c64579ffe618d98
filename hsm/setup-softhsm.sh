#!/usr/bin/env bash
# Create a SoftHSM2 token for keygate in a directory of its own (development, demo, bench, CI).
#
# Usage: hsm/setup-softhsm.sh [DIR [LABEL [SO_PIN [USER_PIN]]]]
#
#   DIR       token store directory       (or KEYGATE_SOFTHSM_DIR; default ./.keygate/softhsm)
#   LABEL     token label, 1..32 chars    (or KEYGATE_HSM_TOKEN_LABEL; default keygate)
#   SO_PIN    security officer PIN        (or KEYGATE_HSM_SO_PIN)
#   USER_PIN  user PIN keygate logs in    (or KEYGATE_HSM_PIN)
#
# Prefer the environment variables for PINs: arguments are visible to other users in `ps`.
# PINs are 4 to 255 characters (SoftHSM's limits).  A PIN given neither way is generated at
# random and written to DIR/pins/LABEL.so.pin or DIR/pins/LABEL.user.pin (mode 0600); keygate
# then reads the user PIN through KEYGATE_HSM_PIN_FILE.
#
# stdout carries only `export ...` lines (and `#` comments naming the module and label), so:
#     eval "$(hsm/setup-softhsm.sh /tmp/kg-hsm)"
# Running it again for a label that already exists leaves the token alone and prints the
# same lines.  softhsm2-util itself still receives the PINs as arguments.
set -euo pipefail

die() { echo "setup-softhsm: $*" >&2; exit 1; }

dir=${1:-${KEYGATE_SOFTHSM_DIR:-./.keygate/softhsm}}
label=${2:-${KEYGATE_HSM_TOKEN_LABEL:-keygate}}
so_pin=${3:-${KEYGATE_HSM_SO_PIN:-}}
user_pin=${4:-${KEYGATE_HSM_PIN:-}}

command -v softhsm2-util >/dev/null 2>&1 \
  || die "softhsm2-util not found; install SoftHSM2 (Debian/Ubuntu: apt-get install -y softhsm2)"
[ "${#label}" -ge 1 ] && [ "${#label}" -le 32 ] || die "the token label must be 1 to 32 characters"

module=${KEYGATE_SOFTHSM_MODULE:-}
if [ -z "$module" ]; then
  for candidate in /usr/lib/softhsm/libsofthsm2.so \
                   /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
                   /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so \
                   /usr/lib64/pkcs11/libsofthsm2.so \
                   /usr/lib/pkcs11/libsofthsm2.so \
                   /usr/local/lib/softhsm/libsofthsm2.so; do
    if [ -f "$candidate" ]; then module=$candidate; break; fi
  done
fi
[ -n "$module" ] && [ -f "$module" ] || die "libsofthsm2.so not found; set KEYGATE_SOFTHSM_MODULE"

umask 077
mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd -P)
conf="$dir/softhsm2.conf"
cat > "$conf" <<EOF
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
EOF
export SOFTHSM2_CONF="$conf"

for pin in "$so_pin" "$user_pin"; do
  if [ -n "$pin" ] && { [ "${#pin}" -lt 4 ] || [ "${#pin}" -gt 255 ]; }; then
    die "PINs must be 4 to 255 characters"
  fi
done

safe_label=$(printf '%s' "$label" | tr -c 'A-Za-z0-9._-' '_')
pins_dir="$dir/pins"
user_pin_file="$pins_dir/$safe_label.user.pin"
so_pin_file="$pins_dir/$safe_label.so.pin"
pin_file=""
new_pin() { od -An -tx1 -N12 /dev/urandom | tr -d ' \n'; }

token_exists() {
  softhsm2-util --show-slots 2>/dev/null | awk -v want="$1" '
    /^[[:space:]]*Label:/ { sub(/^[[:space:]]*Label:[[:space:]]*/, ""); sub(/[[:space:]]+$/, "");
                            if ($0 == want) found = 1 }
    END { exit !found }'
}

if token_exists "$label"; then
  echo "setup-softhsm: token '$label' already exists in $dir; left unchanged" >&2
  if [ -z "$user_pin" ] && [ -f "$user_pin_file" ]; then pin_file=$user_pin_file; fi
else
  mkdir -p "$pins_dir"
  if [ -z "$so_pin" ]; then
    so_pin=$(new_pin)
    printf '%s\n' "$so_pin" > "$so_pin_file"
    echo "setup-softhsm: generated an SO PIN in $so_pin_file" >&2
  fi
  if [ -z "$user_pin" ]; then
    user_pin=$(new_pin)
    printf '%s\n' "$user_pin" > "$user_pin_file"
    pin_file=$user_pin_file
    echo "setup-softhsm: generated a user PIN in $user_pin_file" >&2
  fi
  softhsm2-util --init-token --free --label "$label" --so-pin "$so_pin" --pin "$user_pin" >/dev/null \
    || die "softhsm2-util --init-token failed"
  echo "setup-softhsm: initialised token '$label' in $dir" >&2
fi

printf '# PKCS#11 module: %s\n# token label: %s\n' "$module" "$label"
printf 'export SOFTHSM2_CONF=%q\n' "$conf"
if [ -n "$pin_file" ]; then
  printf 'export KEYGATE_HSM_PIN_FILE=%q\n' "$pin_file"
fi
