//! Fleet-wide state on Redis: the state-backend trait and its Redis implementation.
