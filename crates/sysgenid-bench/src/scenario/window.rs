pub(crate) fn run(_ctx: &mut crate::Ctx) -> Result<(), String> {
    Ok(())
}
