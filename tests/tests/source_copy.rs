//! `commit --remove-source-copy` while the source agent is offline: the CS
//! remembers it and removes the copy when that agent comes back.
