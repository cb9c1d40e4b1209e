"""When a request may go: the adaptive rate, its model and evidence, rate headers, the pacer, retries and
reachability."""
