#!/bin/sh
# Maps the DERP_* environment variables of the community derper images (fredliang44/derper-docker
# and its forks) to meshrelay flags, then execs meshrelay. Extra arguments are passed through and
# win over the variables (Go flag parsing: the last occurrence of a flag counts).
#
#   DERP_DOMAIN                       -hostname
#   DERP_ADDR (:443)                  -a
#   DERP_HTTP_PORT (80)               -http-port
#   DERP_STUN (true)                  -stun
#   DERP_STUN_PORT (3478)             -stun-port
#   DERP_CERT_MODE (manual)           -certmode
#   DERP_CERT_DIR                     -certdir
#   DERP_CONFIG                       -c (node key file, created 0600 if missing)
#   DERP_VERIFY_CLIENTS               -verify-clients
#   DERP_VERIFY_CLIENT_URL            -verify-client-url
#   DERP_VERIFY_CLIENT_URL_FAIL_OPEN  -verify-client-url-fail-open
#   DERP_MESH_WITH                    -mesh-with          (meshrelay additions below)
#   DERP_MESH_PSK_FILE                -mesh-psk-file
#   DERP_METRICS_ADDR                 -metrics-addr
#   DERP_LOG_LEVEL                    -log-level
set -eu

set -- \
    ${DERP_DOMAIN:+-hostname="$DERP_DOMAIN"} \
    ${DERP_ADDR:+-a="$DERP_ADDR"} \
    ${DERP_HTTP_PORT:+-http-port="$DERP_HTTP_PORT"} \
    ${DERP_STUN:+-stun="$DERP_STUN"} \
    ${DERP_STUN_PORT:+-stun-port="$DERP_STUN_PORT"} \
    ${DERP_CERT_MODE:+-certmode="$DERP_CERT_MODE"} \
    ${DERP_CERT_DIR:+-certdir="$DERP_CERT_DIR"} \
    ${DERP_CONFIG:+-c="$DERP_CONFIG"} \
    ${DERP_VERIFY_CLIENTS:+-verify-clients="$DERP_VERIFY_CLIENTS"} \
    ${DERP_VERIFY_CLIENT_URL:+-verify-client-url="$DERP_VERIFY_CLIENT_URL"} \
    ${DERP_VERIFY_CLIENT_URL_FAIL_OPEN:+-verify-client-url-fail-open="$DERP_VERIFY_CLIENT_URL_FAIL_OPEN"} \
    ${DERP_MESH_WITH:+-mesh-with="$DERP_MESH_WITH"} \
    ${DERP_MESH_PSK_FILE:+-mesh-psk-file="$DERP_MESH_PSK_FILE"} \
    ${DERP_METRICS_ADDR:+-metrics-addr="$DERP_METRICS_ADDR"} \
    ${DERP_LOG_LEVEL:+-log-level="$DERP_LOG_LEVEL"} \
    "$@"

exec meshrelay "$@"
