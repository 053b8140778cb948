#!/usr/bin/env bash
# The Prefect side of a deployment, from the project directory the workers use (the image's
# /app, or a checkout on a machine of the Ray cluster). Idempotent: rerun after changing
# prefect.yaml. PREFECT_API_URL must point at the Prefect server (infra/prefect/prefect.yaml
# on Kubernetes, or `prefect server start --host 0.0.0.0` on a machine of yours).
#
#   PREFECT_API_URL=http://prefect-server:4200/api infra/prefect/setup.sh [POOL] [CRON]
set -euo pipefail
cd "$(dirname "$0")/../.."

pool="${1:-ifadapter}"
cron="${2:-0 3 * * 1}"  # the retraining schedule (UTC): Mondays 03:00
: "${PREFECT_API_URL:?set PREFECT_API_URL to the API of the Prefect server, e.g. http://host:4200/api}"

# A process work pool: the worker runs each flow run as a subprocess in its own environment
# (the project image), where the stages reach Ray. Creating it twice is harmless.
prefect work-pool inspect "$pool" >/dev/null 2>&1 || prefect work-pool create "$pool" --type process

# The deployments of prefect.yaml (demo, sdxl, retrain), all on this pool.
prefect --no-prompt deploy --all --pool "$pool"

# The retraining schedule: the file's cron, replaced when another one is asked for.
if [ "$cron" != "0 3 * * 1" ]; then
  prefect deployment schedule clear ifadapter-pipeline/retrain -y
  prefect deployment schedule create ifadapter-pipeline/retrain --cron "$cron" --timezone UTC
fi

echo "now start a worker where the stages can reach Ray: prefect worker start --pool $pool"
