# Sourced by scripts/native.sh and scripts/arm64.sh: apt-get / apt-cache with a private state, for
# packages of another Debian suite or architecture, with no change to the machine's apt setup.
#
#   apt_private STATE "SOURCES" "ARCHS" CMD...   runs CMD with APT_CONFIG pointing at STATE/apt.conf,
#       where SOURCES are the sources.list lines (suite[s], main) and ARCHS the architectures to
#       index ("" for the machine's own). The first call writes the state and runs apt-get update
#       once (STATE/.updated); it returns 1 with the reason in STATE/update.log if that fails.
apt_private() {
    local state="$1" sources="$2" archs="$3"
    shift 3
    if [ ! -f "$state/.updated" ]; then
        mkdir -p "$state/lists/partial" "$state/archives/partial"
        command -v apt-get >/dev/null || { echo "no apt-get (a Debian machine is needed)" >"$state/update.log"; return 1; }
        : > "$state/status"
        {
            echo "Dir::State \"$state\";"
            echo "Dir::State::status \"$state/status\";"
            echo "Dir::State::Lists \"$state/lists\";"
            echo "Dir::Cache \"$state\";"
            echo "Dir::Cache::archives \"$state/archives\";"
            echo "Dir::Etc::SourceList \"$state/sources.list\";"
            echo "Dir::Etc::SourceParts \"/dev/null\";"
            echo "Dir::Etc::Preferences \"/dev/null\";"
            echo "Dir::Etc::PreferencesParts \"/dev/null\";"
            echo "APT::Sandbox::User \"root\";"
            if [ -n "$archs" ]; then
                echo "APT::Architecture \"$(dpkg --print-architecture)\";"
                echo "APT::Architectures { $(for a in $archs; do printf '"%s"; ' "$a"; done)};"
            fi
        } > "$state/apt.conf"
        echo "$sources" > "$state/sources.list"
        APT_CONFIG="$state/apt.conf" apt-get -q --error-on=any update >"$state/update.log" 2>&1 || return 1
        touch "$state/.updated"
    fi
    APT_CONFIG="$state/apt.conf" "$@"
}
