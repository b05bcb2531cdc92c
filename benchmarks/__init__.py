"""meshrelay benchmarks: a DERP load generator (:mod:`.loadgen`) and a runner (:mod:`.run`)."""
