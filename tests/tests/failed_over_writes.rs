//! The failed-over machine writes (DESIGN.md §7 "Hand-over"): its agent at
//! the new site journals the pre-image of every block it changes, so
//! change-point stops it, undoes its writes and brings it up exactly at
//! another point; commit makes what it wrote the base.
