"""The supervisor: heartbeats every replica, replaces dead ones, reconciles with the registry."""
