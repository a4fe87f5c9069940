"""Model parallelism beyond data parallel. `context`: the gated delta rule over a sequence split across ranks
(LASP-2 style state passing)."""
