#!/usr/bin/env bash
# The fault suite (crates/faults): real `enrichd run` replicas as processes against the real
# RabbitMQ and PostgreSQL on loopback plus enrichd-fakes, through kill -9, a broker restart,
# a database restart, provider errors and 429s. It restarts the shared services, so it runs
# on its own, after the other tests (scripts/test.sh calls it last); it never skips: a
# missing service or binary fails it. Extra arguments go to enrichd-faults (--only NAME,
# --list, --logs DIR, --replica-env KEY=VALUE).
set -euo pipefail
cd "$(dirname "$0")/.."

# Whatever happens (a failed check, Ctrl-C, a crash), the services are up again at the end.
trap 'bash scripts/ensure-services.sh >/dev/null 2>&1 || true' EXIT

bash scripts/ensure-services.sh

echo "== fault suite: building enrichd, enrichd-fakes, enrichd-faults (debug)"
cargo build --locked -p enrichd-worker -p enrichd-fakes -p enrichd-faults

echo "== fault suite"
target_dir=${CARGO_TARGET_DIR:-target}
"$target_dir/debug/enrichd-faults" \
  --enrichd "$target_dir/debug/enrichd" \
  --fakes "$target_dir/debug/enrichd-fakes" \
  "$@"
