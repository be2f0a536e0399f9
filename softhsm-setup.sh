#!/usr/bin/env bash
# softhsm-setup.sh: a SoftHSM2 token for development, kept inside the project.
#
# Creates .softhsm/ (or $SOFTHSM_DIR) holding a SoftHSM2 config, its token
# directory and a token labelled keyissuer-dev (or $TOKEN_LABEL) with random
# PINs in .softhsm/user.pin and .softhsm/so.pin, and in it the key pair that
# signs keyissuerd's answers (labelled keyissuer-response-signing, or
# $SIGNING_KEY_LABEL), whose public key goes to .softhsm/response-signing.pub.
# Safe to run again: an existing token, its PINs and its signing key are
# kept. Never touches /var/lib/softhsm.
# Installs softhsm2 with apt-get if it is missing and we are root.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# A relative SOFTHSM_DIR is taken from where the caller stands.
dir=${SOFTHSM_DIR:-$script_dir/.softhsm}
case $dir in
/*) ;;
*) dir=$PWD/$dir ;;
esac
cd "$script_dir"

label=${TOKEN_LABEL:-keyissuer-dev}
module=${SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}

if ! command -v softhsm2-util >/dev/null || [[ ! -e $module ]]; then
	if [[ $(id -u) -ne 0 ]]; then
		echo "SoftHSM2 is not installed. Install it with:" >&2
		echo "  sudo apt-get install softhsm2" >&2
		exit 1
	fi
	echo "Installing softhsm2..."
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq softhsm2 >/dev/null
	if ! command -v softhsm2-util >/dev/null || [[ ! -e $module ]]; then
		echo "softhsm2 installed, but softhsm2-util or $module is still missing" >&2
		exit 1
	fi
fi

# Everything we create is for our eyes only: the PIN files, the tokens.
umask 077
mkdir -p "$dir/tokens"
chmod 700 "$dir"
conf=$dir/softhsm2.conf
printf '%s\n' \
	"directories.tokendir = $dir/tokens" \
	"objectstore.backend = file" \
	"log.level = ERROR" \
	"slots.removable = false" >"$conf.tmp"
mv -f "$conf.tmp" "$conf"
export SOFTHSM2_CONF=$conf

# has_token: is there an initialised token labelled $label in this config?
has_token() {
	softhsm2-util --show-slots | awk -v want="$label" '
		/^[[:space:]]*Label:/ {
			sub(/^[[:space:]]*Label:[[:space:]]*/, ""); sub(/[[:space:]]+$/, "")
			if ($0 == want) found = 1
		}
		END { exit !found }'
}

# random_pin prints 16 random alphanumeric characters.
random_pin() {
	local s=
	while ((${#s} < 16)); do
		s+=$(LC_ALL=C tr -dc 'A-Za-z0-9' < <(head -c 512 /dev/urandom))
	done
	printf '%s' "${s:0:16}"
}

user_pin_file=$dir/user.pin
so_pin_file=$dir/so.pin
if has_token; then
	state=existing
	if [[ ! -s $user_pin_file || ! -s $so_pin_file ]]; then
		echo "Token \"$label\" exists in $dir, but its PIN files are missing." >&2
		echo "To start over (this destroys the token and its keys):" >&2
		echo "  rm -rf ${dir/#$script_dir\//} && ./softhsm-setup.sh" >&2
		exit 1
	fi
else
	state=created
	rm -f "$user_pin_file" "$so_pin_file"
	random_pin >"$user_pin_file"
	random_pin >"$so_pin_file"
	chmod 600 "$user_pin_file" "$so_pin_file"
	# softhsm2-util reads PINs only from its arguments or a terminal.
	softhsm2-util --init-token --free --label "$label" \
		--so-pin "$(<"$so_pin_file")" --pin "$(<"$user_pin_file")" >/dev/null
	if ! has_token; then
		echo "softhsm2-util did not create token \"$label\"" >&2
		exit 1
	fi
fi

# The response-signing key (api.signing_key_label in config.example.toml).
# keyissuer makes it itself, so that it has keyissuer's attributes: a token
# object, sensitive, never extractable, sign-only.
signing_label=${SIGNING_KEY_LABEL:-keyissuer-response-signing}
signing_pub=$dir/response-signing.pub
go=${GO:-go}
if ! command -v "$go" >/dev/null && [[ -x /usr/local/go/bin/go ]]; then
	go=/usr/local/go/bin/go
fi
if command -v "$go" >/dev/null; then
	"$go" run ./cmd/keyissuer signing-key -create -module "$module" -token-label "$label" \
		-pin-file "$user_pin_file" -label "$signing_label" >"$signing_pub.tmp"
	mv -f "$signing_pub.tmp" "$signing_pub"
else
	echo "Go not found: the response-signing key is not made. Once Go is installed, run ./softhsm-setup.sh again." >&2
fi

echo "SoftHSM token \"$label\" ($state) in $dir"
echo "  export SOFTHSM2_CONF=$conf"
echo "  module:   $module"
echo "  user PIN: $user_pin_file"
if [[ -s $signing_pub ]]; then
	echo "  response-signing key \"$signing_label\": $signing_pub"
fi
