//! Request framing checks: ambiguous HTTP/1 framing is answered 400 and never forwarded.
