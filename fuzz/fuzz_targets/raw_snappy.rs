#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| strom_client::fuzzing::raw_snappy(data));
