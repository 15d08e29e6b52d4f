#!/usr/bin/env bash
# The featurestream demo on a machine with nothing configured: the embedded dev stack
# (Kafka, Redis, PostgreSQL from PyPI wheels), the example definitions, and what they make.
# Safe to re-run; stop the stack afterwards with: .venv/bin/featurestream dev down
set -euo pipefail
# shellcheck source=scripts/test.sh
source "$(dirname "${BASH_SOURCE[0]}")/test.sh"  # setup functions only; cds to the repo root

ensure_venv

step() { printf '\n== %s\n' "$*"; }

step "featurestream dev up"
featurestream dev up

step "featurestream apply definitions/"
featurestream apply definitions/

step "featurestream list"
featurestream list

# ---------------------------------------------------------------------------------------
# LATER STEPS GO HERE (in this order, each as a `step` + command):
#   1. produce example events into the source topics
#   2. start the stream worker in the background and wait until it has caught up
#   3. start the serving layer (gRPC + REST) and read features for a few entities
#   4. stop what steps 2-3 started
# ---------------------------------------------------------------------------------------

step "done; the dev stack keeps running (featurestream dev status / featurestream dev down)"
