#!/bin/sh
# ci-trigger.sh: a CI step that deploys through deployhook's admin API and fails the pipeline
# unless the build succeeds.
#
#   DEPLOYHOOK_URL=https://deploy.example.com DEPLOYHOOK_TOKEN=$SECRET ci-trigger.sh site [main]
#
# It triggers PROJECT (BRANCH, default: the project's first) with
# `POST /api/projects/PROJECT/builds`, then polls `GET /api/builds/UUID` every POLL_INTERVAL
# seconds (default 5) until the build has stopped. If a build of that branch is already
# queued, the trigger joins it and this script waits for that build.
#
# Exit status: 0 if the build's outcome is success; 1 if it stopped with any other outcome
# (fail, cancelled, timed_out, interrupted); 2 on bad usage or an API error (wrong token,
# unknown project, daemon unreachable).
#
# Needs only POSIX sh and curl (no jq). The token goes to curl on its standard input, so it
# never shows in the process list; keep it in your CI's secret store. /api must be reachable
# from the CI runner: see docs/install.md for exposing it through the proxy to the runner's
# addresses only.
set -eu

usage="usage: DEPLOYHOOK_URL=... DEPLOYHOOK_TOKEN=... ci-trigger.sh PROJECT [BRANCH]"
project=${1:?$usage}
branch=${2:-}
base=${DEPLOYHOOK_URL:?$usage}
base=${base%/}
token=${DEPLOYHOOK_TOKEN:?$usage}
interval=${POLL_INTERVAL:-5}

# Project and branch names allow no character that needs quoting in a URL or in JSON (see the
# config reference); refusing anything else keeps the requests below well-formed.
case $project in
'' | *[!a-z0-9_-]*)
	echo "invalid project name: $project" >&2
	exit 2
	;;
esac
case $branch in
*[!A-Za-z0-9._/+-]*)
	echo "invalid branch name: $branch" >&2
	exit 2
	;;
esac
if [ -n "$branch" ]; then
	body="{\"branch\":\"$branch\"}"
else
	body="{}"
fi

response=$(mktemp)
trap 'rm -f "$response"' EXIT

# api METHOD PATH [BODY]: the response body goes to $response; prints the HTTP status.
api() {
	printf 'header = "Authorization: Bearer %s"\n' "$token" |
		curl --silent --show-error --max-time 30 --config - \
			--request "$1" --output "$response" --write-out '%{http_code}' \
			${3:+--header "Content-Type: application/json" --data-raw "$3"} \
			"$base$2"
}

# field NAME: the string value of "NAME" in the response (empty when null or absent). The API
# answers compact JSON, and none of the fields read here can contain a quote.
field() {
	sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p" "$response"
}

fail_api() {
	echo "deployhook answered HTTP $1 to $2:" >&2
	cat "$response" >&2
	echo >&2
	exit 2
}

status=$(api POST "/api/projects/$project/builds" "$body") || exit 2
if [ "$status" != 200 ]; then
	fail_api "$status" "the trigger"
fi
uuid=$(field build_uuid)
if [ -z "$uuid" ]; then
	fail_api "$status" "the trigger (no build_uuid)"
fi
echo "build $uuid of $project${branch:+@$branch}: $(field status)"
echo "log: deployhook builds logs --follow $uuid"

# Poll until the build stops. A few failed polls in a row (the daemon restarting, a network
# blip) are tolerated; queued builds survive a restart.
last=
errors=0
while :; do
	sleep "$interval"
	if status=$(api GET "/api/builds/$uuid") && [ "$status" = 200 ]; then
		errors=0
	else
		errors=$((errors + 1))
		if [ "$errors" -ge 5 ]; then
			fail_api "${status:-none}" "polling build $uuid"
		fi
		continue
	fi
	now=$(field status)
	if [ "$now" != "$last" ]; then
		echo "build $uuid: $now"
		last=$now
	fi
	if [ "$now" = stopped ]; then
		break
	fi
done

outcome=$(field build_outcome)
echo "build $uuid: outcome ${outcome:-unknown}"
if [ "$outcome" != success ]; then
	exit 1
fi
