//! Just enough ELF64 (little-endian) parsing for the guest image: whether a binary asks for a
//! program interpreter (is dynamically linked), and the contents of a named section (a kernel
//! module's `.modinfo`).

use anyhow::{bail, Context, Result};

const PT_INTERP: u32 = 3;
const SHN_XINDEX: u16 = 0xffff;
const PHDR_LEN: usize = 56;
const SHDR_LEN: usize = 64;

/// A parsed ELF64 little-endian file header over the file's bytes.
#[derive(Debug)]
pub struct Elf<'a> {
    data: &'a [u8],
    phoff: u64,
    phnum: u16,
    shoff: u64,
    shnum: u64,
    shstrndx: u64,
}

impl<'a> Elf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self> {
        if data.get(..4) != Some(b"\x7fELF") {
            bail!("not an ELF file");
        }
        if data.get(4) != Some(&2) || data.get(5) != Some(&1) {
            bail!("not a 64-bit little-endian ELF file");
        }
        let mut elf = Elf {
            data,
            phoff: read_u64(data, 32)?,
            phnum: read_u16(data, 56)?,
            shoff: read_u64(data, 40)?,
            shnum: read_u16(data, 60)?.into(),
            shstrndx: read_u16(data, 62)?.into(),
        };
        let phentsize = read_u16(data, 54)?;
        let shentsize = read_u16(data, 58)?;
        if elf.phnum != 0 && usize::from(phentsize) != PHDR_LEN {
            bail!("unexpected program header size {phentsize}");
        }
        if elf.shoff != 0 {
            if usize::from(shentsize) != SHDR_LEN {
                bail!("unexpected section header size {shentsize}");
            }
            // Extended numbering: the real counts live in section header 0.
            if elf.shnum == 0 {
                elf.shnum = elf.section_field_u64(0, 32)?;
            }
            if elf.shstrndx == u64::from(SHN_XINDEX) {
                elf.shstrndx = elf.section_field_u32(0, 40)?.into();
            }
        }
        Ok(elf)
    }

    /// True if a `PT_INTERP` program header is present, i.e. the binary is dynamically linked.
    pub fn has_interpreter(&self) -> Result<bool> {
        for index in 0..u64::from(self.phnum) {
            let offset = self.phoff + index * PHDR_LEN as u64;
            if read_u32(self.data, to_usize(offset)?)? == PT_INTERP {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The contents of the section called `name`, if there is one.
    pub fn section(&self, name: &str) -> Result<Option<&'a [u8]>> {
        if self.shoff == 0 {
            return Ok(None);
        }
        let names = self.section_data(self.shstrndx)?;
        for index in 0..self.shnum {
            let name_offset = to_usize(self.section_field_u32(index, 0)?.into())?;
            let found = names
                .get(name_offset..)
                .and_then(|rest| rest.split(|&b| b == 0).next())
                .context("section name outside the section name table")?;
            if found == name.as_bytes() {
                return self.section_data(index).map(Some);
            }
        }
        Ok(None)
    }

    fn section_data(&self, index: u64) -> Result<&'a [u8]> {
        let offset = to_usize(self.section_field_u64(index, 24)?)?;
        let size = to_usize(self.section_field_u64(index, 32)?)?;
        offset
            .checked_add(size)
            .and_then(|end| self.data.get(offset..end))
            .with_context(|| format!("section {index} lies outside the file"))
    }

    fn section_header(&self, index: u64) -> Result<usize> {
        if index >= self.shnum.max(1) {
            bail!("section index {index} out of range");
        }
        to_usize(self.shoff + index * SHDR_LEN as u64)
    }

    fn section_field_u32(&self, index: u64, field: usize) -> Result<u32> {
        read_u32(self.data, self.section_header(index)? + field)
    }

    fn section_field_u64(&self, index: u64, field: usize) -> Result<u64> {
        read_u64(self.data, self.section_header(index)? + field)
    }
}

fn to_usize(value: u64) -> Result<usize> {
    usize::try_from(value).context("offset does not fit in memory")
}

fn bytes<const N: usize>(data: &[u8], offset: usize) -> Result<[u8; N]> {
    offset
        .checked_add(N)
        .and_then(|end| data.get(offset..end))
        .and_then(|slice| slice.try_into().ok())
        .with_context(|| format!("truncated ELF file (reading {N} bytes at offset {offset})"))
}

fn read_u16(data: &[u8], offset: usize) -> Result<u16> {
    bytes(data, offset).map(u16::from_le_bytes)
}

fn read_u32(data: &[u8], offset: usize) -> Result<u32> {
    bytes(data, offset).map(u32::from_le_bytes)
}

fn read_u64(data: &[u8], offset: usize) -> Result<u64> {
    bytes(data, offset).map(u64::from_le_bytes)
}

/// Builds small synthetic ELF files for tests.
#[cfg(test)]
pub(crate) mod synthetic {
    /// An ELF64 file with the given sections (plus the null section and `.shstrtab`) and,
    /// if `interp` is set, a `PT_INTERP` program header after a `PT_LOAD` one.
    pub fn elf(sections: &[(&str, &[u8])], interp: bool) -> Vec<u8> {
        let phnum: u16 = if interp { 2 } else { 1 };
        let mut out = vec![0u8; 64];
        out[..6].copy_from_slice(b"\x7fELF\x02\x01");
        out[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        out[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        out[32..40].copy_from_slice(&64u64.to_le_bytes());
        out[54..56].copy_from_slice(&56u16.to_le_bytes());
        out[56..58].copy_from_slice(&phnum.to_le_bytes());
        out[58..60].copy_from_slice(&64u16.to_le_bytes());
        for p_type in [1u32, 3].iter().take(phnum.into()) {
            let mut phdr = [0u8; 56];
            phdr[..4].copy_from_slice(&p_type.to_le_bytes());
            out.extend_from_slice(&phdr);
        }
        let mut names = vec![0u8];
        let mut headers = vec![[0u8; 64]];
        let shstrtab: (&str, &[u8]) = (".shstrtab", &[]);
        for (index, (name, data)) in sections.iter().chain([&shstrtab]).enumerate() {
            let name_offset = names.len() as u32;
            names.extend_from_slice(name.as_bytes());
            names.push(0);
            let data = if index == sections.len() {
                &names[..]
            } else {
                data
            };
            let mut header = [0u8; 64];
            header[..4].copy_from_slice(&name_offset.to_le_bytes());
            header[24..32].copy_from_slice(&(out.len() as u64).to_le_bytes());
            header[32..40].copy_from_slice(&(data.len() as u64).to_le_bytes());
            out.extend_from_slice(data);
            headers.push(header);
        }
        out.resize(out.len().next_multiple_of(8), 0);
        let shoff = out.len() as u64;
        out[40..48].copy_from_slice(&shoff.to_le_bytes());
        out[60..62].copy_from_slice(&(headers.len() as u16).to_le_bytes());
        out[62..64].copy_from_slice(&((headers.len() - 1) as u16).to_le_bytes());
        for header in headers {
            out.extend_from_slice(&header);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_named_section() {
        let file = synthetic::elf(&[(".text", b"\x90\x90"), (".modinfo", b"a=b\0")], false);
        let elf = Elf::parse(&file).unwrap();
        assert_eq!(elf.section(".modinfo").unwrap(), Some(&b"a=b\0"[..]));
        assert_eq!(elf.section(".text").unwrap(), Some(&b"\x90\x90"[..]));
        assert_eq!(elf.section(".modinf").unwrap(), None);
    }

    #[test]
    fn interpreter_header_marks_a_dynamic_binary() {
        let dynamic = synthetic::elf(&[], true);
        let fixed = synthetic::elf(&[], false);
        assert!(Elf::parse(&dynamic).unwrap().has_interpreter().unwrap());
        assert!(!Elf::parse(&fixed).unwrap().has_interpreter().unwrap());
    }

    #[test]
    fn this_test_binary_is_dynamically_linked() {
        // Test binaries are built without +crt-static, so they name an interpreter.
        let data = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let elf = Elf::parse(&data).unwrap();
        assert!(elf.has_interpreter().unwrap());
        assert!(elf.section(".text").unwrap().is_some());
    }

    #[test]
    fn rejects_non_elf_and_truncated_files() {
        assert!(Elf::parse(b"#!/bin/sh\n").is_err());
        let file = synthetic::elf(&[(".modinfo", b"x\0")], true);
        assert!(Elf::parse(&file[..40]).is_err());
        let cut = &file[..file.len() - 64];
        assert!(Elf::parse(cut)
            .and_then(|elf| elf.section(".modinfo"))
            .is_err());
    }
}
