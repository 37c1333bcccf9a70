# Helpers for installing Debian packages on a fresh machine. Sourced, not run.
# The project's machines are Debian and we are usually root; elsewhere sudo is used.

: "${_APT_UPDATED:=0}"

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    echo "error: need root or sudo to run: $*" >&2
    return 1
  fi
}

# Installs Debian packages by name. 'apt-get update' runs once per script run,
# because on a fresh machine the package lists may be empty or stale.
apt_install() {
  echo "installing Debian package(s): $*" >&2
  if [ "$_APT_UPDATED" != 1 ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    _APT_UPDATED=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "$@"
}

# ensure_tool TOOL PACKAGE: installs the Debian PACKAGE that ships TOOL, unless TOOL is
# already on PATH or in /usr/sbin (nginx lives there and is not on a user's PATH).
ensure_tool() {
  if ! command -v "$1" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$1" ]; then
    echo "$1 is missing" >&2
    apt_install "$2"
  fi
}

# Installs each named tool from the Debian package of the same name, unless it is
# already there (see ensure_tool).
ensure_tools() {
  local tool
  for tool in "$@"; do
    ensure_tool "$tool" "$tool"
  done
}
