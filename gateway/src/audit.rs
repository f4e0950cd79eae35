//! `fairgate audit`: replays a decision log against an exact reference limiter.
