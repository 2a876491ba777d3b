"""clients: typed Python clients for rm_server and policy_server (issues 3 and 4)."""
