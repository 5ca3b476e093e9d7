"""Reports: run summaries, learning curves and the good-vs-broken comparison."""
