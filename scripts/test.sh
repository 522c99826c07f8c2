#!/usr/bin/env bash
# The test command: services up, then formatting, lints and every test (unit, integration
# against the real PostgreSQL and RabbitMQ). CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/ensure-services.sh

export IT_DATABASE_URL=${IT_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test?sslmode=disable}
export IT_AMQP_URL=${IT_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}

echo "== cargo fmt"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "== docs"
RUSTDOCFLAGS=-Dwarnings cargo doc --locked --workspace --no-deps
echo "== doc tests"
cargo test --locked --workspace --doc
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --no-fail-fast
else
  cargo test --locked --workspace --no-fail-fast
fi
# Last and on its own: it restarts PostgreSQL and RabbitMQ under live replicas.
echo "== fault suite"
bash scripts/faults.sh
