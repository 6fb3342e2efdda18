"""A customizable consistent-hashing load balancer."""
