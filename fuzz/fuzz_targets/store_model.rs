#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| strom_state::fuzzing::store_model(data));
