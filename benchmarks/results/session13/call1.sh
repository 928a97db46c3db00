#!/usr/bin/env bash
# session 13, call 1: session 12's next.sh as it was committed (a held-out campaign of the trainer with session 12's
# defaults, then Gemma-4-E2B's graph profile at 2,048 tokens).
exec bash "$(dirname "$0")/../session12/next.sh"
