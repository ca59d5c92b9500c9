//! A one-minute `rebound soak`: fio verify, random kills, network faults,
//! every retained point compared at the end.
