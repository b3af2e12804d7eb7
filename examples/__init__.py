"""Demo backends the gateway routes to (DESIGN §1, §2 `gateway demo`)."""
