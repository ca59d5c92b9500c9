//! A corrupt record in a closed interval's retention journal: the rest is set
//! aside and reported, the points it affects are marked, nothing else is lost.
