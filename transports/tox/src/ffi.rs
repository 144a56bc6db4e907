//! Hand-written declarations for the part of c-toxcore 0.2.18 that veilmesh
//! uses; build.rs verifies the constants against the installed tox.h.

#![allow(non_camel_case_types)]

use std::os::raw::{c_char, c_int, c_void};

#[repr(C)]
pub struct Tox {
    _private: [u8; 0],
}

#[repr(C)]
pub struct Tox_Options {
    _private: [u8; 0],
}

pub const ADDRESS_SIZE: usize = 38;
pub const MAX_CUSTOM_PACKET_SIZE: usize = 1373;

pub type Tox_Connection = c_int;
pub const CONNECTION_TCP: Tox_Connection = 1;
pub const CONNECTION_UDP: Tox_Connection = 2;

pub const SAVEDATA_TYPE_TOX_SAVE: c_int = 1;
pub const ERR_OK: c_int = 0;
pub const ERR_FRIEND_ADD_ALREADY_SENT: c_int = 5;

pub type FriendRequestCb = unsafe extern "C" fn(*mut Tox, *const u8, *const u8, usize, *mut c_void);
pub type FriendConnectionCb = unsafe extern "C" fn(*mut Tox, u32, Tox_Connection, *mut c_void);
pub type SelfConnectionCb = unsafe extern "C" fn(*mut Tox, Tox_Connection, *mut c_void);
pub type FriendLossyCb = unsafe extern "C" fn(*mut Tox, u32, *const u8, usize, *mut c_void);

extern "C" {
    pub fn tox_options_new(error: *mut c_int) -> *mut Tox_Options;
    pub fn tox_options_free(options: *mut Tox_Options);
    pub fn tox_options_set_ipv6_enabled(options: *mut Tox_Options, enabled: bool);
    pub fn tox_options_set_udp_enabled(options: *mut Tox_Options, enabled: bool);
    pub fn tox_options_set_local_discovery_enabled(options: *mut Tox_Options, enabled: bool);
    pub fn tox_options_set_start_port(options: *mut Tox_Options, port: u16);
    pub fn tox_options_set_end_port(options: *mut Tox_Options, port: u16);
    pub fn tox_options_set_tcp_port(options: *mut Tox_Options, port: u16);
    pub fn tox_options_set_savedata_type(options: *mut Tox_Options, kind: c_int);
    pub fn tox_options_set_savedata_data(options: *mut Tox_Options, data: *const u8, length: usize);

    pub fn tox_new(options: *const Tox_Options, error: *mut c_int) -> *mut Tox;
    pub fn tox_kill(tox: *mut Tox);
    pub fn tox_get_savedata_size(tox: *const Tox) -> usize;
    pub fn tox_get_savedata(tox: *const Tox, savedata: *mut u8);
    pub fn tox_bootstrap(
        tox: *mut Tox,
        host: *const c_char,
        port: u16,
        public_key: *const u8,
        error: *mut c_int,
    ) -> bool;
    pub fn tox_add_tcp_relay(
        tox: *mut Tox,
        host: *const c_char,
        port: u16,
        public_key: *const u8,
        error: *mut c_int,
    ) -> bool;
    pub fn tox_iteration_interval(tox: *const Tox) -> u32;
    pub fn tox_iterate(tox: *mut Tox, user_data: *mut c_void);

    pub fn tox_self_get_address(tox: *const Tox, address: *mut u8);
    pub fn tox_self_get_dht_id(tox: *const Tox, dht_id: *mut u8);
    pub fn tox_self_get_udp_port(tox: *const Tox, error: *mut c_int) -> u16;
    pub fn tox_self_get_tcp_port(tox: *const Tox, error: *mut c_int) -> u16;

    pub fn tox_friend_add(
        tox: *mut Tox,
        address: *const u8,
        message: *const u8,
        length: usize,
        error: *mut c_int,
    ) -> u32;
    pub fn tox_friend_add_norequest(tox: *mut Tox, public_key: *const u8, error: *mut c_int)
        -> u32;
    pub fn tox_friend_delete(tox: *mut Tox, friend_number: u32, error: *mut c_int) -> bool;
    pub fn tox_self_get_friend_list_size(tox: *const Tox) -> usize;
    pub fn tox_self_get_friend_list(tox: *const Tox, friend_list: *mut u32);
    pub fn tox_friend_by_public_key(
        tox: *const Tox,
        public_key: *const u8,
        error: *mut c_int,
    ) -> u32;
    pub fn tox_friend_get_public_key(
        tox: *const Tox,
        friend_number: u32,
        public_key: *mut u8,
        error: *mut c_int,
    ) -> bool;
    pub fn tox_friend_send_lossy_packet(
        tox: *mut Tox,
        friend_number: u32,
        data: *const u8,
        length: usize,
        error: *mut c_int,
    ) -> bool;

    pub fn tox_callback_friend_request(tox: *mut Tox, callback: FriendRequestCb);
    pub fn tox_callback_friend_connection_status(tox: *mut Tox, callback: FriendConnectionCb);
    pub fn tox_callback_friend_lossy_packet(tox: *mut Tox, callback: FriendLossyCb);
    pub fn tox_callback_self_connection_status(tox: *mut Tox, callback: SelfConnectionCb);
}

#[cfg(test)]
extern "C" {
    /// From src/abi_check.c: linking it proves the check was compiled.
    pub fn veilmesh_tox_abi_checked() -> c_int;
}
