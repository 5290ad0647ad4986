"""Online rebalancing: replay a stream of serving steps through a policy, migration cost included."""
