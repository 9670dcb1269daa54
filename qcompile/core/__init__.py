"""The arithmetic written once (grids, accumulators, requantization, BatchNorm): imports nothing of qcompile."""
