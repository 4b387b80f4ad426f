"""Speed, memory and quality measurements; results go to bench/RESULTS.md."""
