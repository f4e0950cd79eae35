//! Wiring of the fleet-wide (Redis) state backend into the gateway.
