"""tandem EPLB planner service: a thin gRPC shell over tandem.eplb.planner."""
