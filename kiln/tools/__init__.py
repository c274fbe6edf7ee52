"""The tools around the engine: inputs, inspect, bench, compare, doctor, report."""
