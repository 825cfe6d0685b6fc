#!/bin/sh
# The medkms image's entrypoint: checks that what must be mounted at run time is there,
# then becomes the service (exec, so it receives SIGTERM itself).
#
#   medkms-entrypoint node         kms-node serve --config "$MEDKMS_CONFIG"
#   medkms-entrypoint node-init    kms-node init  --config "$MEDKMS_CONFIG"  (prints the
#                                  node's public identity as JSON for the registry admin)
#   medkms-entrypoint coordinator  kms-coordinator serve --config "$MEDKMS_CONFIG"
#
# MEDKMS_CONFIG defaults to /etc/medkms/node.toml or /etc/medkms/coordinator.toml.
# MEDKMS_PIN_DIR (default /run/secrets/medkms/pins) is where the node's PIN files are
# mounted; set it empty when the node config reads its PINs from the environment instead.
# Which files the node reads, and their modes, is the config's business: kms-node checks
# them (outside the data and token directories, readable by no one else).
set -eu

fail() {
    echo "medkms-entrypoint: $*" >&2
    exit 64
}

role="${1:-}"
case "$role" in
    node | node-init) default_config=/etc/medkms/node.toml ;;
    coordinator) default_config=/etc/medkms/coordinator.toml ;;
    *) fail "usage: medkms-entrypoint node|node-init|coordinator (got '${role}')" ;;
esac
config="${MEDKMS_CONFIG:-$default_config}"

if [ ! -f "$config" ]; then
    fail "no config at $config: mount the $role's TOML file there (a ConfigMap) or set MEDKMS_CONFIG"
fi
if [ ! -r "$config" ]; then
    fail "config $config is not readable by uid $(id -u): give the mount a mode or group it can read"
fi

if [ "$role" != coordinator ]; then
    pin_dir="${MEDKMS_PIN_DIR-/run/secrets/medkms/pins}"
    if [ -n "$pin_dir" ]; then
        if [ ! -d "$pin_dir" ]; then
            fail "no PINs mounted at $pin_dir: mount the Secret holding the token's PIN files there (or set MEDKMS_PIN_DIR empty if the config names hsm_pin_env)"
        fi
        if [ -z "$(ls -A "$pin_dir")" ]; then
            fail "the PIN mount $pin_dir is empty: the Secret holds no PIN files"
        fi
    fi
fi

case "$role" in
    node) exec kms-node serve --config "$config" ;;
    node-init) exec kms-node init --config "$config" ;;
    coordinator) exec kms-coordinator serve --config "$config" ;;
esac
