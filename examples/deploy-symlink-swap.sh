#!/bin/sh
# deploy-symlink-swap.sh: publish a build's output as a new release and switch the site to it
# atomically, keeping the last few releases for a quick rollback.
#
#   $DEPLOY_ROOT/
#     releases/000041-<build uuid>/   one directory per deploy, never changed once published
#     releases/000042-<build uuid>/
#     current -> releases/000042-…    what the web server serves (root /srv/www/site/current)
#
# Use it as the last step of a project's command; it runs in the build's directory:
#
#   [projects.site]
#   command = "npm ci && npm run build && sh /usr/local/share/deployhook/deploy-symlink-swap.sh dist"
#   env = { DEPLOY_ROOT = "/srv/www/site", KEEP_RELEASES = "5" }
#
# The switch is one rename(2) of a symlink over `current`: every request sees the whole old
# release or the whole new one, never a half-copied tree or a missing `current`. A failed
# build never reaches the switch (the `&&` chain stops first), so the site stays as it was.
# Rollback: `ln -sfn releases/<older> $DEPLOY_ROOT/.current.tmp && mv -T $DEPLOY_ROOT/.current.tmp $DEPLOY_ROOT/current`.
# Needs GNU mv (-T), as on Debian; the build user must own $DEPLOY_ROOT (and the service's
# ReadWritePaths= must cover it).
set -eu

src=${1:?usage: deploy-symlink-swap.sh SOURCE_DIR (with DEPLOY_ROOT set)}
root=${DEPLOY_ROOT:?set DEPLOY_ROOT to the directory holding releases/ and current}
keep=${KEEP_RELEASES:-5}
case $keep in
'' | *[!0-9]* | 0)
	echo "KEEP_RELEASES must be a positive number, not '$keep'" >&2
	exit 2
	;;
esac
if [ ! -d "$src" ]; then
	echo "no such directory: $src" >&2
	exit 1
fi
mkdir -p "$root/releases"

# Release names start with a zero-padded sequence number, so they sort in deploy order even
# when two deploys fall in the same second; the rest names the build that made it.
last=000000
for d in "$root"/releases/[0-9][0-9][0-9][0-9][0-9][0-9]-*; do
	if [ -d "$d" ]; then
		last=${d##*/}
	fi
done
last=${last%%-*}
# "1$last" - 1000000 reads 000041 as 41 (a leading 0 would make it octal).
seq=$(printf '%06d' $((1$last - 1000000 + 1)))
name=$seq-${DEPLOYHOOK_BUILD_UUID:-$(date -u +%Y%m%dT%H%M%SZ)}
release=$root/releases/$name

# 1. Copy the output into a fresh directory. Until step 2 nothing points at it, so a copy
#    that fails halfway is never served.
mkdir "$release"
cp -R "$src"/. "$release"/
echo "published $src as releases/$name"

# 2. Switch: make the new link under a temporary name, then rename it over `current` (mv -T
#    renames the link itself instead of moving it into the directory `current` points to).
#    The link is relative, so $DEPLOY_ROOT can be moved or mounted elsewhere.
ln -sfn "releases/$name" "$root/.current.tmp"
mv -T "$root/.current.tmp" "$root/current"
echo "current -> releases/$name"

# 3. Prune: keep the newest $keep releases (oldest sort first); never the one just published.
count=0
for d in "$root"/releases/[0-9][0-9][0-9][0-9][0-9][0-9]-*; do
	count=$((count + 1))
done
for d in "$root"/releases/[0-9][0-9][0-9][0-9][0-9][0-9]-*; do
	if [ "$count" -le "$keep" ]; then
		break
	fi
	if [ "$d" != "$release" ]; then
		rm -rf -- "$d"
		echo "removed old release ${d##*/}"
	fi
	count=$((count - 1))
done
