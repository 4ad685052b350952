#!/bin/sh
# cms-webhook.sh: what a headless CMS does when an editor publishes something: POST a small
# JSON document to a deploy hook URL. Use it to test a hook, or from a CMS that can only run
# a command.
#
#   HOOK_URL=https://deploy.example.com/hooks/… cms-webhook.sh entry.publish post hello-world
#
# Create the hook with `deployhook hooks create site --name cms` (the URL is printed once).
# The URL is the only credential, so it is read from $HOOK_URL, or from the file named by
# $HOOK_URL_FILE, and handed to curl on its standard input: it never shows in the process
# list or in a shell history.
#
# The build sees the body as a file named by $DEPLOYHOOK_PAYLOAD (mode 0600; empty for API
# triggers and empty bodies). A project's command can read it, e.g. with this in deploy.toml:
#
#   command = "sh ./build.sh"
#
# and in build.sh:
#
#   if [ -n "${DEPLOYHOOK_PAYLOAD:-}" ]; then
#       slug=$(sed -n 's/.*"slug":"\([A-Za-z0-9._-]*\)".*/\1/p' "$DEPLOYHOOK_PAYLOAD")
#       echo "deploying after a change to ${slug:-an unknown entry}"
#   fi
#   npm ci && npm run build
#
# Triggers that arrive while a build of the branch is still queued join it (the response says
# "already_exists":true), so a burst of edits makes one build; that build's payload is the
# first trigger's.
set -eu

usage="usage: HOOK_URL=... cms-webhook.sh EVENT MODEL SLUG   (e.g. entry.publish post hello-world)"
event=${1:?$usage}
model=${2:?$usage}
slug=${3:?$usage}
if [ -n "${HOOK_URL_FILE:-}" ]; then
	url=$(cat "$HOOK_URL_FILE")
else
	url=${HOOK_URL:?$usage}
fi

# Only characters that need no escaping in JSON, so the document below stays well-formed.
for value in "$event" "$model" "$slug"; do
	case $value in
	*[!A-Za-z0-9._-]*)
		echo "only letters, digits, '.', '_' and '-' please: $value" >&2
		exit 2
		;;
	esac
done

payload=$(printf '{"event":"%s","model":"%s","entry":{"slug":"%s"},"sent_at":"%s"}' \
	"$event" "$model" "$slug" "$(date -u +%Y-%m-%dT%H:%M:%SZ)")

# --fail: exit non-zero on 404 (unknown, rotated or deleted hook), 413, 429 or 503, as a CMS
# would mark the delivery failed. --retry covers a daemon that is restarting.
printf 'url = "%s"\n' "$url" |
	curl --silent --show-error --fail --max-time 30 --retry 3 --config - \
		--header "Content-Type: application/json" --data-raw "$payload"
echo
