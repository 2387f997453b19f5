"""Where weights live: the dp / tp / sidp layouts over the ("dp", "tp") mesh, logical-axis sharding
rules, and the analytic bytes and KV-capacity formulas."""
