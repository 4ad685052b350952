#!/bin/sh
# ci-trigger.sh: a CI step that deploys through deployhook's admin API and fails the pipeline
# unless the deploy succeeds.
#
#   DEPLOYHOOK_URL=https://deploy.example.com DEPLOYHOOK_TOKEN=$SECRET ci-trigger.sh site [main]
#
# It triggers PROJECT (BRANCH, default: the project's first) with
# `POST /api/projects/PROJECT/builds?wait=SECONDS`, which answers once the build has stopped
# (SPEC §4.3). If a build of that branch is already queued, the trigger joins it; if a newer
# push supersedes the build, the daemon follows it to the newer build (whose code includes
# this one's) and answers with that one, so a superseded deploy is not a failure. When the
# wait runs out before the build stops (HTTP 202), the script waits again with
# `GET /api/builds/UUID/wait` until DEPLOY_TIMEOUT seconds (default 3600) have passed.
#
# Exit status: 0 if the deploy succeeded; 1 if it stopped with any other outcome (fail,
# timed_out, cancelled, interrupted); 2 on bad usage or an API error (wrong token, unknown
# project, daemon unreachable); 3 if it had not finished after DEPLOY_TIMEOUT seconds.
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
timeout=${DEPLOY_TIMEOUT:-3600}

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
case $timeout in
'' | *[!0-9]* | 0)
	echo "DEPLOY_TIMEOUT must be a positive number of seconds: $timeout" >&2
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
deadline=$(($(date +%s) + timeout))

# left: seconds until the deadline, at most 3600 (the longest one wait may be).
left() {
	l=$((deadline - $(date +%s)))
	if [ "$l" -gt 3600 ]; then l=3600; fi
	echo "$l"
}

# api METHOD PATH [BODY]: the response body goes to $response; prints the HTTP status. The
# request may be held for up to 3600 s while the daemon waits for the build.
api() {
	printf 'header = "Authorization: Bearer %s"\n' "$token" |
		curl --silent --show-error --max-time 3700 --config - \
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

# The deadline is read once per request: read twice, a second boundary can pass in between
# and the request would ask for `wait=0`, which the daemon refuses.
wait=$(left)
if [ "$wait" -lt 1 ]; then wait=1; fi
status=$(api POST "/api/projects/$project/builds?wait=$wait" "$body") || exit 2
uuid=$(field build_uuid)
if [ -z "$uuid" ]; then
	fail_api "$status" "the trigger"
fi
echo "build $uuid of $project${branch:+@$branch}: $(field status)"
echo "log: deployhook builds logs --follow $uuid"

# 202: not stopped yet. Wait again on the build the daemon answered with (it may already be
# a newer one that superseded ours). A few failed requests in a row (the daemon restarting, a
# network blip) are tolerated; queued builds survive a restart.
errors=0
while [ "$status" = 202 ] || [ "$status" = 000 ]; do
	wait=$(left)
	if [ "$wait" -le 0 ]; then
		echo "build $uuid: not finished after ${timeout}s ($(field status))" >&2
		exit 3
	fi
	[ "$status" = 202 ] && uuid=$(field build_uuid)
	if status=$(api GET "/api/builds/$uuid/wait?timeout=$wait"); then
		errors=0
	else
		status=000
		errors=$((errors + 1))
		if [ "$errors" -ge 5 ]; then
			echo "deployhook unreachable while waiting for build $uuid" >&2
			exit 2
		fi
		sleep 2
	fi
done

final=$(field build_uuid)
if [ -z "$final" ]; then
	fail_api "$status" "the wait for build $uuid"
fi
from=$(field followed_from)
if [ -n "$from" ]; then
	echo "build $from was superseded; followed it to build $final"
fi
outcome=$(field build_outcome)
echo "build $final: outcome ${outcome:-unknown}"
case $status in
200) exit 0 ;;
422 | 409 | 503) exit 1 ;;
*) fail_api "$status" "the wait for build $final" ;;
esac
