#!/bin/sh
# Load for docker-compose (`docker compose --profile load up`): numbered QoS 1 telemetry
# from $DEVICES devices to the device broker, and numbered commands to the cloud side.
# One long-lived mosquitto_pub per topic reads its payloads from stdin (-l), so each topic
# is one connection with in-order numbers: gaps, duplicates and inversions are visible.
set -eu
: "${DEVICES:=20}"             # devices, i.e. topics per direction
: "${INTERVAL:=0.05}"          # seconds between two telemetry messages of one device
: "${CMD_INTERVAL:=1}"         # seconds between two commands to one device
: "${COUNT:=0}"                # messages per topic; 0 = until stopped
: "${DEVICE_BROKER:=mosquitto}"
: "${CLOUD_BROKER:=emqx}"

numbers() { # {"seq":1}, {"seq":2}, ... one line every $1 seconds
  i=0
  while [ "$COUNT" -eq 0 ] || [ "$i" -lt "$COUNT" ]; do
    i=$((i + 1))
    echo "{\"seq\":$i}"
    sleep "$1"
  done
}

d=0
while [ "$d" -lt "$DEVICES" ]; do
  numbers "$INTERVAL" | mosquitto_pub -h "$DEVICE_BROKER" -q 1 -i "load-tel-$d" \
    -t "devices/dev-$d/telemetry" -l &
  numbers "$CMD_INTERVAL" | mosquitto_pub -h "$CLOUD_BROKER" -q 1 -i "load-cmd-$d" \
    -t "cmd/dev-$d/set" -l &
  d=$((d + 1))
done
echo "loadgen: $DEVICES devices, telemetry every ${INTERVAL}s, commands every ${CMD_INTERVAL}s"
wait
