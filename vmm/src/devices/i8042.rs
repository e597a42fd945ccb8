//! A minimal i8042 keyboard controller: enough for Linux's probes, and the
//! reset command (0xfe written to port 0x64) as a clean exit.

/// Data port.
pub const DATA_PORT: u16 = 0x60;
/// Command / status port.
pub const COMMAND_PORT: u16 = 0x64;
/// The "pulse reset line" command.
pub const CMD_RESET: u8 = 0xfe;

/// What a write to the controller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum I8042Action {
    /// Nothing to do.
    None,
    /// The guest asked for a CPU reset.
    Reset,
}

/// Read a port of the controller: no data, buffers empty.
pub fn read(_port: u16) -> u8 {
    0
}

/// Write a port of the controller.
pub fn write(port: u16, value: u8) -> I8042Action {
    if port == COMMAND_PORT && value == CMD_RESET {
        I8042Action::Reset
    } else {
        I8042Action::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_only_on_fe_to_64() {
        assert_eq!(write(COMMAND_PORT, CMD_RESET), I8042Action::Reset);
        assert_eq!(write(DATA_PORT, CMD_RESET), I8042Action::None);
        assert_eq!(write(COMMAND_PORT, 0xd1), I8042Action::None);
        assert_eq!(read(COMMAND_PORT), 0);
    }
}
